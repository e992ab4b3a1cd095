"""Engine: sampling, the generation loop."""
