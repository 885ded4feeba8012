"""What the user sees: Rich renderables built from cache snapshots (`panel`), memory probes
(`memory`) and the occupancy plot (`plot`, needs the `plot` extra)."""
