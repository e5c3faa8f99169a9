"""What every upstream adapter shares: the run-time compatibility shims, the run pool, the reproduce command."""
