use serde::Deserialize;

use super::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    a: Option<u16>,
    b: Option<Vec<u16>>,
    c: Option<Inner>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Inner {
    x: Option<String>,
}

fn paths(src: &str) -> Vec<String> {
    let tree = parse_tree(src).unwrap();
    let (_, errs) = deserialize_all::<Doc>(&tree);
    errs.into_iter()
        .map(|e| e.path.unwrap_or_default())
        .collect()
}

#[test]
fn every_structural_error_is_found_with_its_path() {
    let src = "a: x\nb: [1, y, 3, 70000]\nc: {x: [1], z: 2}\nd: 1\n";
    assert_eq!(paths(src), ["a", "b[1]", "b[3]", "c.x", "c.z", "d"]);
}

#[test]
fn a_clean_document_deserializes() {
    let tree = parse_tree("a: 1\nb: [2]\nc: {x: y}\n").unwrap();
    let (doc, errs) = deserialize_all::<Doc>(&tree);
    assert!(errs.is_empty());
    let doc = doc.unwrap();
    assert_eq!(doc.a, Some(1));
    assert_eq!(doc.b, Some(vec![2]));
    // YAML 1.2 booleans: `y` is a string, not `true`.
    assert_eq!(doc.c.unwrap().x.as_deref(), Some("y"));
}

#[test]
fn positions_point_at_keys_and_values() {
    let tree = parse_tree("a: 1\nc:\n  x: hello\nb:\n  - 5\n").unwrap();
    let idx = PosIndex::build(&tree);
    assert_eq!(idx.lookup("a"), Pos { line: 1, col: 4 });
    assert_eq!(idx.key_pos("a"), Pos { line: 1, col: 1 });
    assert_eq!(idx.lookup("c"), Pos { line: 2, col: 1 });
    assert_eq!(idx.lookup("c.x"), Pos { line: 3, col: 6 });
    assert_eq!(idx.lookup("b[0]"), Pos { line: 5, col: 5 });
    // Missing keys fall back to their nearest ancestor.
    assert_eq!(idx.lookup("c.missing"), Pos { line: 2, col: 1 });
    assert_eq!(idx.lookup("nothing.here"), Pos::START);
}

#[test]
fn parse_failures_are_located_and_named() {
    let f = parse_tree("a: 1\nb:\n  c: 1\n  c: 2\n").unwrap_err();
    assert_eq!((f.pos.line, f.path.as_str()), (4, "b.c"));
    assert!(f.message.contains("duplicate key `c`"), "{}", f.message);
    let f = parse_tree("x: [1, 2\n").unwrap_err();
    assert!(f.pos.line >= 1);
}

#[test]
fn path_at_tracks_lists_and_maps() {
    let src = "a:\n  - x: 1\n  - y: [1, 2]\n";
    assert_eq!(path_at(src, Pos { line: 3, col: 5 }), "a[1].y");
    assert_eq!(path_at(src, Pos { line: 2, col: 8 }), "a[0].x");
    assert_eq!(path_at(src, Pos { line: 1, col: 1 }), "a");
}

#[test]
fn aliases_are_budgeted() {
    let mut src = String::from("a0: &a0 [x, x, x, x, x, x, x, x]\n");
    for i in 1..8 {
        let p = i - 1;
        src.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    let f = parse_tree(&src).unwrap_err();
    assert!(f.message.contains("too deeply aliased"), "{}", f.message);
    // A modest, legitimate use of anchors is fine.
    assert!(parse_tree("a: &x [1, 2]\nb: *x\n").is_ok());
}
