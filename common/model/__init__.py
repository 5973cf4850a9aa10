"""The paper's network (eq. 1-14): encoders, disentangler, mapper, diffusion, memory, fusion."""
