"""Expert weight formats: one object per quantized kind, and records that combine them.

quant (the formats and their pure quantize / to-compute / linear functions), record.RecordCodec (an expert's
two matrices in their formats, as one record), packing / groupwise / ternary (the arithmetic under them).
"""
