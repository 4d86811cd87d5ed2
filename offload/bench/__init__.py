"""offload-bench: one module per subcommand, the shared helpers in `common`, and the cost model."""
