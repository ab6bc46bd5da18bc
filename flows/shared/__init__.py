"""Steps several runbooks share: request validation, the recovery report, the lock and approval gates, promotion,
the application cutover and the DNS switch. A runbook imports from here, never from another runbook's module."""
