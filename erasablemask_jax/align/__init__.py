"""Face detection (MTCNN in Flax) and five-point similarity alignment."""
