//! The handler manifest parser on arbitrary text: an error or a manifest,
//! never a panic; a manifest that parses is valid, and written back as
//! TOML it parses again to the same manifest (what `deploy` stores is what
//! was validated).

#![no_main]

use hookmesh::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(manifest) = Manifest::from_toml(text, "fuzz") else {
        return;
    };
    assert!(manifest.validate().is_ok());
    let written = toml::to_string(&manifest).expect("a manifest serialises");
    let again = Manifest::from_toml(&written, "fuzz again");
    assert_eq!(again.as_ref().ok(), Some(&manifest), "{written}");
});
