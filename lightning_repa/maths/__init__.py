"""Pure tensor maths, free of Lightning and of diffusers: the alignment losses (`losses`), token
grids and resampling (`align`), kernel alignment (`kernel_alignment`: CKNNA, CKA and their
stateful measure) and the weight schedule with its cutoff (`schedule`). May import: choices."""
