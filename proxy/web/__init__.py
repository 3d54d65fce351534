"""What pgwarden shows people: the advice page of the admin server, and the reports of
`pgwarden report`, built from the same view of /advice and /fingerprints."""
