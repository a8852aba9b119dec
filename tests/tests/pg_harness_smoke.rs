//! TEMPORARY smoke test of tests/src/pg.rs; to be deleted.

use std::process::Command;
use std::time::Instant;

use anyhow::Result;
use watchdog_tests::pg::TestPostgres;

fn psql_url(url: &str, sql: &str) -> std::process::Output {
    Command::new("/usr/bin/psql")
        .args(["-X", "-v", "ON_ERROR_STOP=1", url, "-c", sql])
        .env_remove("PGPASSWORD")
        .output()
        .unwrap()
}

fn scenario(name: &str) -> Result<()> {
    let t = Instant::now();
    let pg = TestPostgres::start()?;
    eprintln!("[{name}] start() took {:?} port {} url {}", t.elapsed(), pg.port(), pg.url());
    assert_eq!(pg.query("select 1")?, "1");
    assert_eq!(pg.query("select current_user")?, "postgres");

    let ro = psql_url(&pg.url_as("readonly", "secret"), "create table t(x int)");
    eprintln!("[{name}] readonly create: {:?} {}", ro.status, String::from_utf8_lossy(&ro.stderr).trim());
    assert!(!ro.status.success());
    assert!(String::from_utf8_lossy(&ro.stderr).contains("permission denied for schema public"));
    let ro_sel = psql_url(&pg.url_as("readonly", "secret"), "select 1");
    assert!(ro_sel.status.success(), "{}", String::from_utf8_lossy(&ro_sel.stderr));

    let rw = psql_url(&pg.url(), "create table t(x int)");
    assert!(rw.status.success(), "{}", String::from_utf8_lossy(&rw.stderr));

    let bad = psql_url(&pg.url_as("watchdog", "wrong"), "select 1");
    eprintln!("[{name}] wrong password: {:?} {}", bad.status, String::from_utf8_lossy(&bad.stderr).trim());
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("password authentication failed"));

    pg.query("insert into t values (1), (2)")?;
    assert_eq!(pg.query("select count(*) from t")?, "2");
    assert!(pg.query("select * from nonexistent").is_err());
    eprintln!("[{name}] query error looks like: {:#}", pg.query("select * from nonexistent").unwrap_err());

    pg.stop()?;
    assert!(pg.query("select 1").is_err());
    let t = Instant::now();
    pg.restart()?;
    eprintln!("[{name}] restart() took {:?}", t.elapsed());
    assert_eq!(pg.query("select count(*) from t")?, "2");
    let rw = psql_url(&pg.url(), "select count(*) from t");
    assert!(rw.status.success());

    let dir = pg.dir().to_owned();
    let t = Instant::now();
    drop(pg);
    eprintln!("[{name}] drop took {:?}", t.elapsed());
    assert!(!dir.exists());
    Ok(())
}

#[test]
fn one() -> Result<()> {
    scenario("one")
}

#[test]
fn two() -> Result<()> {
    scenario("two")
}

#[test]
#[should_panic(expected = "boom")]
fn panics_but_cleans_up() {
    let pg = TestPostgres::start().unwrap();
    std::fs::write("/tmp/pgsmoke-panic-dir", pg.dir().to_string_lossy().as_bytes()).unwrap();
    panic!("boom");
}
