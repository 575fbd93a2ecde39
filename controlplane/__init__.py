"""The BlueMarble control plane: node registry, ring, placement, election and trades."""
