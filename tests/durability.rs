//! Durable delivery on the embedded store: kanbans accepted by the runtime survive kill -9 of the runtime and of
//! microservices. (The same scenarios run against Redis in tests/redis_store.rs.)
mod common;
use common::scenarios;

#[test]
fn queued_kanbans_survive_a_runtime_kill_9_and_memory_mode_does_not() {
    scenarios::queued_kanbans_survive_kill_9(&[]);
}

#[test]
fn static_kanbans_survive_a_runtime_kill_9() {
    scenarios::static_kanbans_survive_kill_9(&[]);
}

#[test]
fn kill_9_at_random_points_loses_nothing_in_a_100k_pipeline() {
    scenarios::kill_9_at_random_points_loses_nothing(&[]);
}
