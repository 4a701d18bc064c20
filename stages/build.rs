// Embed libtorch's directories as the binary's rpath so it runs with no extra
// environment. torch-sys (links = "tch") exports the directory it linked.
// The CUDA build of libtorch_cpu.so needs libcudart and libcupti, which pip
// installs beside torch under nvidia/*/lib; since libtorch_cpu.so carries no
// runpath of its own, the binary's search path must reach them, which only
// DT_RPATH (not the newer DT_RUNPATH) does for indirect dependencies.
fn main() {
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else { return };
    compile_cpp(std::path::Path::new(&lib));
    println!("cargo:rustc-link-arg=-Wl,--disable-new-dtags");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    let nvidia = std::path::Path::new(&lib).join("../../nvidia");
    if let Ok(entries) = std::fs::read_dir(&nvidia) {
        let mut dirs: Vec<_> = entries.flatten().map(|e| e.path().join("lib")).filter(|p| p.is_dir()).collect();
        dirs.sort();
        for dir in dirs {
            let dir = dir.canonicalize().unwrap_or(dir);
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
        }
    }
    if nvidia.is_dir() {
        println!("cargo:rerun-if-changed={}", nvidia.display());
    }
    println!("cargo:rerun-if-changed=build.rs");
}

/// `cpp/`, compiled against libtorch's headers as torch-sys compiles its own
/// C++ (C++17, the new libstdc++ ABI the PyPI wheels use).
fn compile_cpp(lib: &std::path::Path) {
    let include = lib.join("../include");
    cc::Build::new()
        .cpp(true)
        .file("cpp/onednn_linear.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile("llmflow_cpp");
    println!("cargo:rerun-if-changed=cpp");
}
