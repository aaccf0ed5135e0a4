"""Deployment tools: `ctk serve` (server, fleet of replicas), its commands, and the tiny test model."""
