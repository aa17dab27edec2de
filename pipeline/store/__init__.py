"""Storage: one fsspec-backed Store, the OUT layout, Arrow schemas, partials and versions."""
