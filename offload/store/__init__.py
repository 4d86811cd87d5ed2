"""Where experts come from: architectures, the checkpoint itself, and converted disk stores.

arch (where each architecture keeps its experts), source.CheckpointSource (one expert at a time from
safetensors), layout.ExpertLayout (an expert as one record of bytes), disk.DiskStore / disk.RamStore (records by
key), convert (streaming, resumable checkpoint -> store), codec (lz4 / lzma record compression).
"""
