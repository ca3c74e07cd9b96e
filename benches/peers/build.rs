//! Links PMDK's libpmemobj when it is installed (Debian: `libpmemobj-dev`)
//! and sets `cfg(pmemobj)`; without it the PMDK bank is left out of the
//! run (with a note) instead of failing the build.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(pmemobj)");
    println!("cargo::rerun-if-env-changed=RVM_PEERS_NO_PMDK");
    let found = ["/usr/include/libpmemobj.h", "/usr/local/include/libpmemobj.h"]
        .iter()
        .any(|p| std::path::Path::new(p).exists());
    if found && std::env::var_os("RVM_PEERS_NO_PMDK").is_none() {
        println!("cargo::rustc-cfg=pmemobj");
        println!("cargo::rustc-link-lib=pmemobj");
    } else {
        println!("cargo::warning=libpmemobj not found (apt-get install libpmemobj-dev): the PMDK bank is left out");
    }
}
