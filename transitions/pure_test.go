package transitions

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// stateAPI is what TestPure's checks of state are checked against: state's
// exported top-level identifiers, and those of its functions that do I/O
// or read the clock, as far as the syntax of its non-test files tells.
type stateAPI struct {
	exported map[string]bool // every exported top-level identifier
	funcs    map[string]bool // the exported functions (no methods)
	io       map[string]bool // the exported functions that do I/O
}

// stateIOSelectors are, per import path, the selectors by which a function
// of state reaches the disk, the network, the processes or the clock: the
// impure selectors of TestPure, except that path/filepath only counts for
// what reads the file system (Join and Clean compute), and renameio and
// io/fs's file system functions do I/O too.
func stateIOSelectors() map[string]map[string]bool {
	sel := map[string]map[string]bool{}
	for path, names := range impure {
		sel[path] = names
	}
	sel["path/filepath"] = map[string]bool{"Abs": true, "EvalSymlinks": true, "Glob": true, "Walk": true, "WalkDir": true}
	sel["io/fs"] = map[string]bool{"Glob": true, "ReadDir": true, "ReadFile": true, "Stat": true, "WalkDir": true}
	sel["github.com/google/renameio/v2"] = map[string]bool{"*": true}
	return sel
}

// readStateAPI parses state's non-test files (whatever their build
// constraints) and finds which of its functions do I/O: those that use an
// I/O selector themselves, call a function of state that does, or make a
// value of a type of state one of whose methods does (RealClock's clock
// reads time.Now in its method). A method call is taken to reach every
// method of that name: an over-estimate, which only makes more functions
// count as I/O (LinkExists, for its syscall.EPERM).
func readStateAPI(t *testing.T) stateAPI {
	t.Helper()
	files, err := filepath.Glob(filepath.Join("..", "state", "*.go"))
	if err != nil {
		t.Fatal(err)
	}
	ioSel := stateIOSelectors()
	api := stateAPI{exported: map[string]bool{}, funcs: map[string]bool{}, io: map[string]bool{}}
	type fn struct {
		direct  bool
		calls   []string // functions of state called by name
		methods []string // methods called, by name
		types   []string // types of state it makes values of
	}
	funcs := map[string]*fn{}         // "F" or "Recv.M"
	byMethod := map[string][]string{} // method name -> its keys in funcs
	byType := map[string][]string{}   // receiver type -> its methods' keys in funcs
	fset := token.NewFileSet()
	parsed := 0
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, parser.SkipObjectResolution)
		if err != nil {
			t.Fatal(err)
		}
		parsed++
		named := map[string]string{}
		for _, imp := range f.Imports {
			path, err := strconv.Unquote(imp.Path.Value)
			if err != nil {
				t.Fatal(err)
			}
			n := path[strings.LastIndex(path, "/")+1:]
			if strings.HasSuffix(path, "/v2") {
				n = path[strings.LastIndex(path[:len(path)-3], "/")+1 : len(path)-3]
			}
			if imp.Name != nil {
				n = imp.Name.Name
			}
			named[n] = path
		}
		for _, d := range f.Decls {
			switch d := d.(type) {
			case *ast.GenDecl:
				for _, spec := range d.Specs {
					switch spec := spec.(type) {
					case *ast.TypeSpec:
						if spec.Name.IsExported() {
							api.exported[spec.Name.Name] = true
						}
					case *ast.ValueSpec:
						for _, id := range spec.Names {
							if id.IsExported() {
								api.exported[id.Name] = true
							}
						}
					}
				}
			case *ast.FuncDecl:
				key := d.Name.Name
				if d.Recv != nil && len(d.Recv.List) > 0 {
					recv := d.Recv.List[0].Type
					if s, ok := recv.(*ast.StarExpr); ok {
						recv = s.X
					}
					if g, ok := recv.(*ast.IndexExpr); ok {
						recv = g.X
					}
					if id, ok := recv.(*ast.Ident); ok {
						key = id.Name + "." + d.Name.Name
						byType[id.Name] = append(byType[id.Name], key)
					}
					byMethod[d.Name.Name] = append(byMethod[d.Name.Name], key)
				} else if d.Name.IsExported() {
					api.exported[key] = true
					api.funcs[key] = true
				}
				info := &fn{}
				funcs[key] = info
				if d.Body == nil {
					continue
				}
				ast.Inspect(d.Body, func(n ast.Node) bool {
					switch n := n.(type) {
					case *ast.SelectorExpr:
						if x, ok := n.X.(*ast.Ident); ok {
							if path, ok := named[x.Name]; ok && (ioSel[path]["*"] || ioSel[path][n.Sel.Name]) {
								info.direct = true
							}
						}
					case *ast.CompositeLit:
						if id, ok := n.Type.(*ast.Ident); ok {
							info.types = append(info.types, id.Name)
						}
					case *ast.CallExpr:
						switch f := n.Fun.(type) {
						case *ast.Ident:
							info.calls = append(info.calls, f.Name)
						case *ast.SelectorExpr:
							if x, ok := f.X.(*ast.Ident); !ok || named[x.Name] == "" {
								info.methods = append(info.methods, f.Sel.Name)
							}
						}
					}
					return true
				})
			}
		}
	}
	if parsed < 10 {
		t.Fatalf("parsed %d non-test files of state: the check would prove nothing", parsed)
	}
	doesIO := map[string]bool{}
	for key, f := range funcs {
		doesIO[key] = f.direct
	}
	for changed := true; changed; {
		changed = false
		for key, f := range funcs {
			if doesIO[key] {
				continue
			}
			reach := func(keys []string) bool { return slices.ContainsFunc(keys, func(k string) bool { return doesIO[k] }) }
			reaches := reach(f.calls) ||
				slices.ContainsFunc(f.methods, func(m string) bool { return reach(byMethod[m]) }) ||
				slices.ContainsFunc(f.types, func(t string) bool { return reach(byType[t]) })
			if reaches {
				doesIO[key], changed = true, true
			}
		}
	}
	for name := range api.funcs {
		if doesIO[name] {
			api.io[name] = true
		}
	}
	return api
}

// planted returns the findings of impureUses on a file of transitions
// whose source is src.
func planted(t *testing.T, src string) []string {
	t.Helper()
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, "planted.go", src, parser.SkipObjectResolution)
	if err != nil {
		t.Fatalf("%v:\n%s", err, src)
	}
	return impureUses(f, fset)
}

// TestPureRefusesStateIO: TestPure refuses every use of state that is not
// on pureState, and so every function of state that does I/O, each
// checked by a planted file that uses it (under state's own name and under
// another); pureState names nothing state lacks, none of the functions
// found to do I/O, and all of it passes.
func TestPureRefusesStateIO(t *testing.T) {
	api := readStateAPI(t)
	for _, name := range []string{"DecodeFile", "CheckUnbound", "CheckLayout", "ReadToken", "ReadLockInfo",
		"Open", "NewLock", "SyncDir", "System", "RealClock"} {
		if !api.io[name] {
			t.Errorf("state.%s is not found to do I/O (or to read the clock): the analysis of state's functions misses it (I/O functions found: %v)", name, sortedKeys(api.io))
		}
	}
	for name := range pureState {
		if !api.exported[name] {
			t.Errorf("pureState lists state.%s, which state does not export", name)
		}
		if api.io[name] {
			t.Errorf("pureState lists state.%s, which does I/O or reads the clock", name)
		}
	}
	refused := 0
	for _, name := range sortedKeys(api.exported) {
		if pureState[name] {
			continue
		}
		refused++
		use := "var _ = state." + name
		if api.funcs[name] {
			use = "func init() { state." + name + "() }"
		}
		for _, imp := range []string{`"github.com/depcache/depcache/state"`, `state "github.com/depcache/depcache/state"`} {
			src := "package transitions\n\nimport " + imp + "\n\n" + use + "\n"
			if bad := planted(t, src); len(bad) != 1 || !strings.Contains(bad[0], "state."+name) {
				t.Errorf("a planted use of state.%s (import %s) is not refused, once: %q", name, imp, bad)
			}
		}
		alias := "package transitions\n\nimport st \"github.com/depcache/depcache/state\"\n\nvar _ = st." + name + "\n"
		if bad := planted(t, alias); len(bad) != 1 || !strings.Contains(bad[0], "st."+name) {
			t.Errorf("a planted use of state.%s imported as st is not refused, once: %q", name, bad)
		}
	}
	if refused < 20 {
		t.Errorf("only %d identifiers of state are refused: the check would prove little", refused)
	}
	var uses []string
	for _, name := range sortedKeys(pureState) {
		uses = append(uses, "\t_ = state."+name)
	}
	src := "package transitions\n\nimport \"github.com/depcache/depcache/state\"\n\nfunc init() {\n" + strings.Join(uses, "\n") + "\n}\n"
	if bad := planted(t, src); len(bad) != 0 {
		t.Errorf("uses of pureState's identifiers refused: %q", bad)
	}
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
