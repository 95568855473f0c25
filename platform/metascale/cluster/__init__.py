"""Distribution: the coordinator (driver) fans meta-steps out to Ray worker actors and aggregates."""
