//! Compiles proto/ with protox (pure Rust), so no `protoc` binary is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["isthmus/v1/isthmus.proto"];
    println!("cargo:rerun-if-changed=isthmus");
    let fds = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
