"""Workers: rank resolution, shard claims, the run lock, checkpoints, signals and the shard
loop that ties inputs, engine and store together for one worker."""
