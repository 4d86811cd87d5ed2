"""The user-facing commands: offload-chat and offload-convert (offload-bench lives in offload.bench)."""
