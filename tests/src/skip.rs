//! Tests that need something from outside the workspace (chromium, Node.js, mount) and
//! cannot run without it: a skip is never silent.

/// Reports that `test` cannot run here because of `why`: `SKIPPED <test>: <why>` on stdout
/// (.config/nextest.toml shows these tests' output in the summary), or a panic when
/// `TETHER_TEST_REQUIRE_ALL=1`, which .ci/run sets so that in CI every test really runs.
pub fn skip(test: &str, why: &str) {
    if std::env::var_os("TETHER_TEST_REQUIRE_ALL").is_some_and(|v| v == "1") {
        panic!("{test} cannot run here ({why}) and TETHER_TEST_REQUIRE_ALL=1 forbids skipping it");
    }
    println!("SKIPPED {test}: {why}");
}
