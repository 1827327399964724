"""Quantization as a pass family: options, what to quantize, Q/DQ insertion, mask bounding.

``options`` parses ``--quantize SCHEME[:k=v,...]``; ``select`` decides what stays out (masks,
integer paths) and what needs 16 bits; ``quantize`` inserts Q/DQ in the target's form from a
calibration cache; ``blockwise`` writes block-wise int4 weights; ``mask_fill`` bounds -inf masks
for targets that quantize every tensor.
"""
