-- The base-model registry (service-wide names → model URIs, with shapes from config.json and the weights checksum),
-- and what a job records at submit about its model and datasets (checked again by the worker) and its estimate.
CREATE TABLE base_models (
    id uuid PRIMARY KEY,
    name text NOT NULL UNIQUE,
    uri text NOT NULL,
    sha256 text CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    architecture text NOT NULL,
    model_type text NOT NULL,
    hidden_size integer NOT NULL,
    num_layers integer NOT NULL,
    vocab_size integer NOT NULL,
    intermediate_size integer NOT NULL,
    num_attention_heads integer NOT NULL,
    num_key_value_heads integer NOT NULL,
    modules jsonb NOT NULL,
    weights_bytes bigint,
    source text NOT NULL CHECK (source IN ('api', 'config')),
    created_at timestamptz NOT NULL
);

ALTER TABLE fine_tune_jobs
    ADD COLUMN model_uri text,
    ADD COLUMN model_sha256 text,
    ADD COLUMN dataset_tokens bigint,
    ADD COLUMN dataset_truncated integer,
    ADD COLUMN dataset_skipped integer,
    ADD COLUMN validation_sha256 text,
    ADD COLUMN validation_examples integer,
    ADD COLUMN validation_tokens bigint,
    ADD COLUMN estimated_tokens bigint,
    ADD COLUMN estimated_seconds double precision;
