// Embed libtorch's directory as the binary's rpath so it runs with no extra
// environment. torch-sys (links = "tch") exports the directory it linked.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
