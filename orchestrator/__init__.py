"""Everything distributed: Ray Train wiring, checkpoint storage, and (later) Hub mirror, validation
actors, preemption and notifications. Imports relay_train; relay_train never imports this."""
