"""The partitioner: training the embedded default, profiling, cost model and planning (``splitinfer plan``)."""
