"""Training: configs, data, variable-rate RD training, mask decay to a student, RRL scalable encoders, RD metrics
and the student study driver."""
