"""Inference: one-shot forward and NLL (`forward`), the cache fed chunk by chunk and decoding
(`generation`), and streamed NLL over inputs of any length (`stream`)."""
