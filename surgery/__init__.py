"""Model surgery for S²FT: find coupled structures, permute them into blocks, verify the function."""
