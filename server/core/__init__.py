"""The recognition path between the protocols and the model: a stream's session (audio intake,
windows, decoding state, results), admission, the cross-stream batch scheduler and the service
that ties them together. No torch, no grpc: the model is reached through ``server.model``'s engine."""
