-- merge: true on a job also publishes the base model with the adapter merged in (merged/ in the adapter folder).
ALTER TABLE fine_tune_jobs ADD COLUMN merge boolean NOT NULL DEFAULT false;
