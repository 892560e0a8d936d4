"""The toy world: procedural shapes, tiny real pipelines and exact rule rewards (DESIGN §5)."""
