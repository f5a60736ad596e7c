"""What ships: the package, the image and deployments, the examples, benchmarks, soak."""
