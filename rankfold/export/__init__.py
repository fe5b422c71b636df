"""Export: a compressed model as a self-contained transformers folder (remote code generated from
rankfold's own modules), or in the servable `lowrank` / `dense` forms."""
