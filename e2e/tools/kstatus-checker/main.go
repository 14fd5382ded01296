// kstatus-checker evaluates the health of a Kubernetes object (a JSON file, as
// `kubectl get -o json` prints it) with the real libraries GitOps tools use:
//
//	kstatus-checker kstatus <object.json>
//	    prints the status sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute
//	    returns (InProgress, Current, Failed, Terminating, NotFound, Unknown)
//	    and, on a second line, its message. Flux, kpt and Config Sync use it.
//	kstatus-checker argocd-lua <health.lua> <object.json>
//	    runs an Argo CD resource health script in gopher-lua, the interpreter
//	    Argo CD embeds, with the object as the global `obj`, and prints the
//	    returned status (Healthy, Progressing, Degraded, Suspended, Missing,
//	    Unknown) and, on a second line, its message.
//
// Only the libraries Argo CD opens for health scripts are available to the
// Lua (package, base, table), so a script that passes here runs in Argo CD.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

func main() {
	if len(os.Args) < 3 {
		usage()
	}
	switch os.Args[1] {
	case "kstatus":
		// The apimachinery decoder, as client-go's: integers stay int64.
		data, err := os.ReadFile(os.Args[2])
		if err != nil {
			fail("reading %s: %v", os.Args[2], err)
		}
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(data); err != nil {
			fail("%s is not a Kubernetes object: %v", os.Args[2], err)
		}
		res, err := status.Compute(u)
		if err != nil {
			fail("kstatus: %v", err)
		}
		fmt.Printf("%s\n%s\n", res.Status, res.Message)
	case "argocd-lua":
		if len(os.Args) < 4 {
			usage()
		}
		script, err := os.ReadFile(os.Args[2])
		if err != nil {
			fail("reading %s: %v", os.Args[2], err)
		}
		st, msg := runHealthLua(string(script), readObject(os.Args[3]))
		fmt.Printf("%s\n%s\n", st, msg)
	default:
		usage()
	}
}

func usage() {
	fail("usage: kstatus-checker kstatus <object.json> | kstatus-checker argocd-lua <health.lua> <object.json>")
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(2)
}

func readObject(path string) map[string]any {
	data, err := os.ReadFile(path)
	if err != nil {
		fail("reading %s: %v", path, err)
	}
	var obj map[string]any
	if err := json.Unmarshal(data, &obj); err != nil {
		fail("%s is not a JSON object: %v", path, err)
	}
	return obj
}

// runHealthLua runs `script` the way Argo CD's util/lua does for health checks.
func runHealthLua(script string, obj map[string]any) (string, string) {
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			fail("opening %s: %v", lib.name, err)
		}
	}
	l.SetGlobal("obj", toLua(l, obj))
	if err := l.DoString(script); err != nil {
		fail("health script: %v", err)
	}
	ret, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		fail("health script returned %s, not a table", l.Get(-1).Type())
	}
	st := ret.RawGetString("status")
	if st.Type() != lua.LTString {
		fail("health script returned no status")
	}
	return st.String(), lua.LVAsString(ret.RawGetString("message"))
}

// toLua converts decoded JSON into Lua values as Argo CD does: objects and
// arrays become tables (arrays 1-based), numbers LNumber.
func toLua(l *lua.LState, v any) lua.LValue {
	switch v := v.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(v)
	case float64:
		return lua.LNumber(v)
	case string:
		return lua.LString(v)
	case []any:
		t := l.NewTable()
		for _, item := range v {
			t.Append(toLua(l, item))
		}
		return t
	case map[string]any:
		t := l.NewTable()
		for k, item := range v {
			t.RawSetString(k, toLua(l, item))
		}
		return t
	default:
		fail("unexpected JSON value %T", v)
		return lua.LNil
	}
}
