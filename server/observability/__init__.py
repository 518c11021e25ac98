"""What the server reports: the ``Observer`` hooks the recognition path calls, their Prometheus
mapping (``metrics``, the only module that imports prometheus_client), GC pauses and throttled logs."""
