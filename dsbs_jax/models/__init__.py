"""The T5 network in Flax (layers and the encoder-decoder); no training or data code."""
