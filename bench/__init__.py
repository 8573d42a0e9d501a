# Benchmarks: micro benchmarks of imageio._io and end-to-end scenarios that
# run the daemon side by side with its peers (see bench/README.md).
