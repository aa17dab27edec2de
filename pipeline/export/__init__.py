"""The export stage: patches, deconv projections, grids and the atlas, from an index."""
