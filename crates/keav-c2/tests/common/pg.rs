//! PostgreSQL for one test: a schema no other run uses, dropped at the end (also when the
//! test panics).
//!
//! The database: `KEAV_TEST_POSTGRES` or `postgres://postgres@127.0.0.1:5432/test`.

use std::future::Future;

use keav_c2::registry::PgRegistry;

/// The database the tests use.
pub fn url() -> String {
    std::env::var("KEAV_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A schema name no other test run uses: `keav_<tag>_<pid>_<nanos>`.
pub fn schema(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "keav_{tag}_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000
    )
}

/// A registry in `schema`; fails the test with a message when no PostgreSQL answers.
pub async fn connect(schema: &str) -> PgRegistry {
    let url = url();
    match PgRegistry::connect(&url, schema).await {
        Ok(r) => r,
        Err(e) => panic!(
            "PostgreSQL unreachable at {url} ({e}); start it (trust auth, user postgres, \
             database test) or set KEAV_TEST_POSTGRES"
        ),
    }
}

/// Runs `body` (on its own task), then drops `schema`; a panic in `body` is raised again
/// after the schema is gone.
pub async fn dropping_schema<Fut>(schema: &str, body: Fut)
where
    Fut: Future<Output = ()> + Send + 'static,
{
    let outcome = tokio::spawn(body).await;
    connect(schema).await.drop_schema().await.unwrap();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Runs `body` with a fresh schema named after `tag`, then drops the schema (also if `body`
/// panicked).
pub async fn in_schema<F, Fut>(tag: &str, body: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let s = schema(tag);
    dropping_schema(&s, body(s.clone())).await;
}
