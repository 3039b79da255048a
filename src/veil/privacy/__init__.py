"""Privacy mechanisms, each a plug-in stage of the update pipeline: differential privacy now."""
