"""KV-cache memory: blocks and the tensors behind them."""
