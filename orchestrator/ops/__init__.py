"""What an operator runs around a job: the spot-notice agent, the job supervisor and `relay status`.
Imports run/, services/, core/ and relay_train."""
