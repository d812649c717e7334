-- Verified GPU speed: per GPU, what the provider's last checked challenge
-- showed (`challenge::gpu_speed`): the work of its checked proofs divided
-- by the round trip the coordinator timed, never more than advertised.
-- MFLOP/s (FLOP per microsecond). A wrong or late answer removes a
-- provider's rows; the scheduler reads them for `min_tflops`.
CREATE TABLE gpu_speed (
    provider          TEXT NOT NULL,
    gpu_uuid          TEXT NOT NULL,
    gpu_name          TEXT NOT NULL,
    verified_mflops   INTEGER NOT NULL,
    observed_mflops   INTEGER NOT NULL,
    advertised_mflops INTEGER NOT NULL,
    proven_flops      INTEGER NOT NULL,
    round_trip_us     INTEGER NOT NULL,
    challenge_id      TEXT NOT NULL,
    at                INTEGER NOT NULL,
    PRIMARY KEY (provider, gpu_uuid)
);
