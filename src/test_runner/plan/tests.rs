use std::path::Path;

use super::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
    p
}

const SHARED: &str = "[boot]\nkernel = \"k\"\ncmdline = \"console=ttyS0\"\n\
[[case]]\nname = \"one\"\nrun = \"true\"\ntags = [\"smoke\"]\n\
[[case]]\nname = \"two\"\n\
[[case]]\nname = \"own\"\ncmdline = \"quiet\"\n";

#[test]
fn a_directory_is_searched_for_toml_files_in_order() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "b.toml", SHARED);
    write(dir.path(), "sub/a.toml", SHARED);
    write(dir.path(), "notes.txt", "x");
    write(dir.path(), ".hidden/c.toml", SHARED);

    // Act
    let found = discover(&[dir.path().to_path_buf()]).unwrap();

    // Assert
    let names: Vec<String> = found
        .iter()
        .map(|p| p.strip_prefix(dir.path()).unwrap().display().to_string())
        .collect();
    assert_eq!(names, vec!["b.toml", "sub/a.toml"]);
}

#[test]
fn an_empty_directory_or_a_missing_path_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        discover(&[dir.path().to_path_buf()]),
        Err(PlanError::Empty(_))
    ));
    assert!(matches!(
        discover(&[dir.path().join("nope.toml")]),
        Err(PlanError::Missing(_))
    ));
}

#[test]
fn cases_without_their_own_cmdline_share_a_boot_that_talks_to_init() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "guest.toml", SHARED);

    // Act
    let plan = build(&[f], &[], 1, &dir.path().join("out")).unwrap();

    // Assert: one shared boot with the kit's channel; `two` has no run, so it runs `true`;
    // `own` boots on its own and, having no run, does not talk to init.
    assert_eq!(plan.groups.len(), 1);
    assert!(plan.groups[0].channel);
    assert_eq!(plan.groups[0].ready.as_str(), kit_ready().as_str());
    let jobs: Vec<(&str, Option<usize>, Option<&str>)> = plan
        .jobs
        .iter()
        .map(|j| (j.name.as_str(), j.group, j.command.as_deref()))
        .collect();
    assert_eq!(
        jobs,
        vec![
            ("guest/one", Some(0), Some("true")),
            ("guest/two", Some(0), Some("true")),
            ("guest/own", None, None),
        ]
    );
    assert_eq!(plan.jobs[0].log, dir.path().join("out/guest/one.log"));
}

#[test]
fn without_a_ready_point_every_case_boots_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "t.toml",
        "[boot]\nkernel = \"k\"\n[[case]]\nname = \"a\"\n[[case]]\nname = \"b\"\n",
    );
    let plan = build(&[f], &[], 1, dir.path()).unwrap();
    assert!(plan.groups.is_empty());
    assert!(plan
        .jobs
        .iter()
        .all(|j| j.group.is_none() && j.command.is_none()));
}

#[test]
fn filters_match_names_paths_and_tags_and_repeat_multiplies() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "guest.toml", SHARED);
    let by_tag = [Filter::new("smoke").unwrap()];
    let by_glob = [Filter::new("guest/t*").unwrap()];
    let none = [Filter::new("nothing*").unwrap()];

    // Act
    let tagged = build(std::slice::from_ref(&f), &by_tag, 3, dir.path()).unwrap();
    let globbed = build(std::slice::from_ref(&f), &by_glob, 1, dir.path()).unwrap();
    let nothing = build(&[f], &none, 1, dir.path());

    // Assert
    let names: Vec<&str> = tagged.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["guest/one [1/3]", "guest/one [2/3]", "guest/one [3/3]"]
    );
    assert_eq!(tagged.jobs[1].log, dir.path().join("guest/one.2.log"));
    assert_eq!(globbed.jobs.len(), 1);
    assert_eq!(globbed.jobs[0].name, "guest/two");
    assert!(matches!(nothing, Err(PlanError::NothingSelected(_))));
}

#[test]
fn two_files_with_one_stem_get_two_output_directories() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(dir.path(), "x/t.toml", SHARED);
    let b = write(dir.path(), "y/t.toml", SHARED);
    let plan = build(&[a, b], &[], 1, dir.path()).unwrap();
    let stems: Vec<&str> = plan.files.iter().map(|f| f.stem.as_str()).collect();
    assert_eq!(stems, vec!["t", "t-2"]);
}

#[test]
fn command_lines_append_the_case_words_and_the_channel_word() {
    let f = testfile::parse(Path::new("t.toml"), SHARED).unwrap();
    assert_eq!(cmdline(&f, None, true), "console=ttyS0 ember.test=serial");
    assert_eq!(cmdline(&f, Some(&f.cases[2]), false), "console=ttyS0 quiet");
}

#[test]
fn file_names_are_made_safe() {
    assert_eq!(file_safe("boots ok/../x"), "boots_ok_.._x");
    assert_eq!(file_safe(".hidden"), "_.hidden");
    assert_eq!(file_safe(""), "_");
}
