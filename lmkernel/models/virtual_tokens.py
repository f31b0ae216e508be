"""Virtual tokens before every sequence: prompt tuning and prefix tuning, as PEFT computes them.

    prompt tuning (Lester et al. 2021):  h_0 = [P; embed(tokens)]          P [n, hidden]
    prefix tuning (Li & Liang 2021):     in every layer l, the keys and values of n positions before the
                                         tokens are learned: K_l, V_l [n, kv_heads, head_dim] (keys as
                                         stored after rotation); the tokens sit at positions n, n+1, ...

Both wrap a model and keep its interface: callers pass their own batch; the wrapper lays `n` placeholder
rows before each sequence (positions restart at 0 per sequence, as every caller's do) and hooks the model
so those rows carry the learned values: the word embeddings (prompt), or each layer's key and value
projections (prefix; a key is written un-rotated so that the layer's rotation gives the learned key).
Under causal attention the placeholder rows reach the tokens only through their keys and values, so
overwriting them at every layer is exactly a learned prefix. For a decoder the wrapper returns the
callers' rows only; for an encoder (prompt tuning) it returns every row and `classify` / `pool` read
the expanded batch, so the classifier sees the first prompt token as PEFT's does. They need whole
sequences in one forward: the paged engine refuses them (see `engine/llm_engine.py`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lmkernel.config import ModelConfig
from lmkernel.layers.attention import AttentionMetadata
from lmkernel.layers.rotary import apply_rotary


class VirtualTokens(nn.Module):
    """The shared part: `model` with `prompt_embeddings` [n, width] for n placeholder rows per sequence."""

    kind = ""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config: ModelConfig = model.config

    def __getattr__(self, name: str) -> object:
        """The wrapped model's attributes (`classifier`, `cls`, ...) read through, as callers check for heads."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.prompt_embeddings.shape[0])

    @property
    def checkpoint_layers(self) -> bool:
        return bool(getattr(self.model, "checkpoint_layers", False))

    @checkpoint_layers.setter
    def checkpoint_layers(self, value: bool) -> None:
        self.model.checkpoint_layers = value

    def expand(self, meta: AttentionMetadata) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor]:
        """The batch with the prompt before each sequence: its metadata, where the callers' rows went,
        and where the prompt rows are."""
        n, bounds = self.num_virtual_tokens, meta.cu_seqlens
        lengths = [e - s for s, e in zip(bounds, bounds[1:])]
        wide = AttentionMetadata.for_lengths([length + n for length in lengths], meta.causal)
        starts = torch.tensor(wide.cu_seqlens[:-1])
        prompt_rows = (starts[:, None] + torch.arange(n)[None, :]).reshape(-1)
        token_rows = torch.cat([torch.arange(s + n, s + n + length) for s, length in zip(wide.cu_seqlens, lengths)]) \
            if lengths else torch.zeros(0, dtype=torch.long)
        return wide, token_rows, prompt_rows

    def _hooks(self) -> list:
        """Forward hooks on the wrapped model that put the learned values in the rows `self.rows` names."""
        raise NotImplementedError

    def _install(self) -> None:
        # The hooks stay on, and the rows of the last forward stay set after it: activation checkpointing
        # reruns the layers' forwards during the backward pass and must see what the forward saw.
        self.rows: torch.Tensor | None = None
        self._handles = self._hooks()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: object = None, **kwargs: object) -> torch.Tensor:
        if kv_caches is not None or meta.paged is not None:
            raise ValueError(f"a {self.kind}-tuned model runs whole sequences, not through a paged KV cache")
        wide, token_rows, prompt_rows = self.expand(meta)
        dev = input_ids.device
        ids = torch.zeros(wide.cu_seqlens[-1], dtype=input_ids.dtype, device=dev).index_copy(0, token_rows.to(dev), input_ids)
        lengths = torch.tensor(wide.cu_seqlens, device=dev).diff()
        pos = torch.arange(int(lengths.sum()), device=dev) - torch.repeat_interleave(
            torch.tensor(wide.cu_seqlens[:-1], device=dev), lengths)
        for key in ("token_type_ids",):
            if kwargs.get(key) is not None:
                kwargs[key] = torch.zeros_like(ids).index_copy(0, token_rows.to(dev), kwargs[key])  # type: ignore[arg-type]
        self.rows = prompt_rows.to(dev)
        hidden = self.model(ids, pos.to(positions.dtype), wide, **kwargs)
        return hidden.index_select(0, token_rows.to(dev)) if meta.causal else hidden

    def _layout(self, meta: AttentionMetadata) -> AttentionMetadata:
        """The layout `forward` returned rows in: the callers' (a decoder), or the expanded one (an encoder)."""
        return meta if meta.causal else self.expand(meta)[0]

    def classify(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model.classify(hidden, self._layout(meta))

    def pool(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model.pool(hidden, self._layout(meta))

    def compute_logits(self, hidden: torch.Tensor, lora: object = None) -> torch.Tensor:
        return self.model.compute_logits(hidden)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"a {self.kind}-tuned encoder has no masked-LM scores per input token (it is for "
                         "classification and embeddings on encoders)")

    def load_weights(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        self.model.load_weights(tensors, source)


class PromptTuned(VirtualTokens):
    """Prompt tuning: `prompt_embeddings` [n, hidden] are the placeholder rows' word embeddings."""

    kind = "prompt"

    def __init__(self, model: nn.Module, num_virtual_tokens: int, init: torch.Tensor | None = None) -> None:
        super().__init__(model)
        tables = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.num_embeddings == self.config.vocab_size]
        if not tables:
            raise ValueError(f"{type(model).__name__} has no word-embedding table to put a prompt before")
        self._table = tables[0]
        w = self._table.weight
        if init is None:  # PEFT's RANDOM init draws from N(0, 1); rows of the vocabulary are a better start
            init = w.detach()[torch.randint(0, w.shape[0], (num_virtual_tokens,))].clone()
        self.prompt_embeddings = nn.Parameter(init.to(w.device, w.dtype).reshape(num_virtual_tokens, w.shape[1]))
        self._install()

    def _hooks(self) -> list:
        def swap(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor | None:
            rows = self.rows
            if rows is None:
                return None
            p = self.prompt_embeddings.to(out.dtype).repeat(len(rows) // self.num_virtual_tokens, 1)
            return out.index_copy(0, rows, p)

        return [self._table.register_forward_hook(swap)]


class PrefixTuned(VirtualTokens):
    """Prefix tuning of a Llama-family decoder: `prompt_embeddings` [n, layers * 2 * kv_width] in PEFT's
    layout (for layer l, columns (2l) * kv_width onwards are its keys, (2l + 1) * kv_width its values)."""

    kind = "prefix"

    def __init__(self, model: nn.Module, num_virtual_tokens: int, init: torch.Tensor | None = None) -> None:
        super().__init__(model)
        c = self.config
        if c.architecture != "llama" or c.is_encoder:
            raise ValueError(f"prefix tuning runs on Llama-family decoders; this is a {c.architecture} model")
        self.width = c.num_kv_heads * c.head_dim
        w = next(model.parameters())
        if init is None:  # the keys and values the model itself gives random vocabulary tokens (Li & Liang's advice)
            init = self._activations(torch.randint(0, c.vocab_size, (num_virtual_tokens,), device=w.device))
        self.prompt_embeddings = nn.Parameter(init.to(w.device, w.dtype).reshape(num_virtual_tokens, -1))
        if self.prompt_embeddings.shape[1] != c.num_layers * 2 * self.width:
            raise ValueError(f"prefix embeddings are {tuple(self.prompt_embeddings.shape)}; this model needs "
                             f"[{num_virtual_tokens}, {c.num_layers * 2 * self.width}]")
        self._install()

    def _rotation(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.rotary.cos_sin(torch.arange(n, device=device), torch.float32)

    def _activations(self, ids: torch.Tensor) -> torch.Tensor:
        """Each layer's keys (rotated, as attention stores them) and values for `ids` as one sequence."""
        n, found = ids.shape[0], []
        cos, sin = self._rotation(n, ids.device)
        hooks = []
        for layer in self.model.model.layers:
            attn = layer.self_attn
            hooks += [attn.k_proj.register_forward_hook(lambda m, a, out: found.append(("k", out.detach()))),
                      attn.v_proj.register_forward_hook(lambda m, a, out: found.append(("v", out.detach())))]
        try:
            with torch.no_grad():
                self.model(ids, torch.arange(n, device=ids.device), AttentionMetadata.for_lengths([n], causal=True))
        finally:
            for h in hooks:
                h.remove()
        cols = []
        for kind, out in found:
            if kind == "k":
                heads = out.float().view(n, -1, self.config.head_dim)
                out = apply_rotary(heads, cos, sin).reshape(n, -1)
            cols.append(out.float())
        return torch.cat(cols, dim=1)

    def _hooks(self) -> list:
        n, d = self.num_virtual_tokens, self.config.head_dim
        handles = []
        for i, layer in enumerate(self.model.model.layers):
            attn = layer.self_attn
            keys = slice(2 * i * self.width, (2 * i + 1) * self.width)
            values = slice((2 * i + 1) * self.width, (2 * i + 2) * self.width)

            def put_keys(module: nn.Module, args: tuple, out: torch.Tensor, cols: slice = keys) -> torch.Tensor | None:
                if self.rows is None:
                    return None
                k = self.prompt_embeddings[:, cols].float().reshape(n, -1, d)
                cos, sin = self._rotation(n, out.device)
                unrotated = apply_rotary(k, cos, -sin).reshape(n, -1)  # R(-t) undoes the layer's R(t)
                return out.index_copy(0, self.rows, unrotated.to(out.dtype).repeat(len(self.rows) // n, 1))

            def put_values(module: nn.Module, args: tuple, out: torch.Tensor, cols: slice = values) -> torch.Tensor | None:
                if self.rows is None:
                    return None
                v = self.prompt_embeddings[:, cols].to(out.dtype)
                return out.index_copy(0, self.rows, v.repeat(len(self.rows) // n, 1))

            handles += [attn.k_proj.register_forward_hook(put_keys), attn.v_proj.register_forward_hook(put_values)]
        return handles
