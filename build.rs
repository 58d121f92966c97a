// `sqlx::migrate!` embeds the migration files at compile time; without this a
// new migration is only picked up when something else recompiles the crate.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
