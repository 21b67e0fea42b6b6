"""End-to-end tests: the real engine, node agents as processes, PostgreSQL, S3, sshd, Kubernetes
(`pytest tests/e2e`)."""
