"""The model: loading (``loading``), the feature front end, the streaming Emformer encoder, the
transducer decoders (greedy and beam), the vocabulary and the batched ``Engine`` that runs one step
for many streams. No grpc."""
