"""Commands over a finished or running output folder: status, finalize, report (and its plots)."""
